// Command ollama-template renders an Ollama Go prompt template the way Ollama's server does
// for /api/chat, so tests can compare it with the model's Jinja chat template.
//
// Standard input: {"template": "...", "messages": [{"role", "content", "thinking"?,
// "tool_calls"?: [{"id"?, "function": {"name", "arguments"}}], "tool_name"?}], "system"?: the
// model's SYSTEM layer, "tools"?: [...], "think": null | true | false}.
// Standard output: {"prompt": "...", "thinking_tags": [open, close] | null, "messages_style": bool}.
//
// What it reproduces (read from Ollama's server/routes.go, server/prompt.go,
// template/template.go and thinking/template.go; the code here is written anew):
//   - the SYSTEM layer becomes a leading system message unless the request starts with one;
//   - consecutive messages of one role are merged with "\n\n" (tool messages never), and all
//     system messages joined with "\n\n" are .System;
//   - a template naming .Messages is run once over the data Ollama gives it; any other
//     ("legacy") template is run once per user turn with .System/.Prompt/.Response, the
//     last run cut after .Response; a template naming neither .Messages nor .Response gets a
//     {{ .Response }} appended;
//   - missingkey=zero and the functions json, currentDate and yesterdayDate
//     (toTypeScriptType, used by none of jobd's templates, is left out: a template calling it
//     fails to parse here);
//   - Ollama's thinking capability: the tags around {{ .Thinking }} inside a range over
//     .Messages, trimmed; the model can think only when both are non-empty.
package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"text/template"
	"text/template/parse"
	"time"
)

type request struct {
	Template string          `json:"template"`
	Messages []inputMessage  `json:"messages"`
	System   string          `json:"system"`
	Tools    json.RawMessage `json:"tools"`
	Think    *bool           `json:"think"`
}

type inputMessage struct {
	Role      string          `json:"role"`
	Content   string          `json:"content"`
	Thinking  string          `json:"thinking"`
	ToolCalls []inputToolCall `json:"tool_calls"`
	ToolName  string          `json:"tool_name"`
}

type inputToolCall struct {
	ID       string `json:"id"`
	Function struct {
		Name      string         `json:"name"`
		Arguments map[string]any `json:"arguments"`
	} `json:"function"`
}

type reply struct {
	Prompt        string     `json:"prompt"`
	ThinkingTags  *[2]string `json:"thinking_tags"`
	MessagesStyle bool       `json:"messages_style"`
}

// jsonText prints as its compact JSON, as Ollama's tool arguments and tool lists do in a
// template ({{ .Function.Arguments }}).
type jsonText map[string]any

func (j jsonText) String() string {
	if j == nil {
		return "{}"
	}
	b, _ := json.Marshal(map[string]any(j))
	return string(b)
}

type toolCallFunction struct {
	Index     int
	Name      string
	Arguments jsonText
}

type toolCall struct {
	ID       string
	Function toolCallFunction
}

// message carries the fields Ollama's templates see on each of .Messages.
type message struct {
	Role       string
	Content    string
	Thinking   string
	ToolCalls  []toolCall
	ToolName   string
	ToolCallID string
}

// tool mirrors the shape of Ollama's tool definitions in a template: .Type, .Function.Name,
// .Function.Description, .Function.Parameters.{Type,Required,Properties}; each level prints
// as JSON.
type tool struct {
	Type     string       `json:"type"`
	Function toolFunction `json:"function"`
}

type toolFunction struct {
	Name        string         `json:"name"`
	Description string         `json:"description"`
	Parameters  toolParameters `json:"parameters"`
}

type toolParameters struct {
	Type       string         `json:"type"`
	Required   []string       `json:"required,omitempty"`
	Properties map[string]any `json:"properties"`
}

func (t tool) String() string         { return marshal(t) }
func (f toolFunction) String() string { return marshal(f) }

type toolList []tool

func (t toolList) String() string { return marshal(t) }

func marshal(v any) string {
	b, _ := json.Marshal(v)
	return string(b)
}

var funcs = template.FuncMap{
	"json": func(v any) string {
		b, _ := json.Marshal(v)
		return string(b)
	},
	// Ollama ignores the format argument too.
	"currentDate": func(args ...string) string {
		return time.Now().Format("2006-01-02")
	},
	"yesterdayDate": func(args ...string) string {
		return time.Now().AddDate(0, 0, -1).Format("2006-01-02")
	},
}

func main() {
	var req request
	if err := json.NewDecoder(os.Stdin).Decode(&req); err != nil {
		fail("read the request: %v", err)
	}
	out, err := render(req)
	if err != nil {
		fail("%v", err)
	}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		fail("write the reply: %v", err)
	}
}

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "ollama-template: "+format+"\n", args...)
	os.Exit(1)
}

func render(req request) (reply, error) {
	tmpl, err := template.New("").Option("missingkey=zero").Funcs(funcs).Parse(req.Template)
	if err != nil {
		return reply{}, fmt.Errorf("parse the template: %w", err)
	}
	names := identifiers(tmpl.Root)
	messagesStyle := names["messages"]
	if !messagesStyle && !names["response"] {
		tmpl.Root.Nodes = append(tmpl.Root.Nodes, responseAction())
	}

	msgs := req.Messages
	if req.System != "" && (len(msgs) == 0 || msgs[0].Role != "system") {
		msgs = append([]inputMessage{{Role: "system", Content: req.System}}, msgs...)
	}
	system, collated := collate(msgs)

	think, thinkSet, thinkLevel := false, req.Think != nil, ""
	if req.Think != nil && *req.Think {
		// Ollama's level for a plain `think: true`.
		think, thinkLevel = true, "medium"
	}

	var b bytes.Buffer
	if messagesStyle {
		var tools toolList
		if len(req.Tools) > 0 && string(req.Tools) != "null" {
			if err := json.Unmarshal(req.Tools, &tools); err != nil {
				return reply{}, fmt.Errorf("read tools: %w", err)
			}
		}
		data := map[string]any{
			"System":     system,
			"Messages":   collated,
			"Tools":      tools,
			"Response":   "",
			"Think":      think,
			"ThinkLevel": thinkLevel,
			"IsThinkSet": thinkSet,
		}
		if err := tmpl.Execute(&b, data); err != nil {
			return reply{}, fmt.Errorf("execute the template: %w", err)
		}
	} else if err := legacy(tmpl, collated, think, thinkSet, thinkLevel, &b); err != nil {
		return reply{}, err
	}

	out := reply{Prompt: b.String(), MessagesStyle: messagesStyle}
	if open, close := thinkingTags(tmpl.Root); open != "" && close != "" {
		out.ThinkingTags = &[2]string{open, close}
	}
	return out, nil
}

// collate merges consecutive messages of one role (tool messages keep their own) and
// returns every system message's content joined, as Ollama does before rendering.
func collate(in []inputMessage) (string, []*message) {
	var system []string
	var out []*message
	for _, m := range in {
		if m.Role == "system" {
			system = append(system, m.Content)
		}
		if n := len(out); n > 0 && out[n-1].Role == m.Role && m.Role != "tool" {
			out[n-1].Content += "\n\n" + m.Content
			continue
		}
		msg := &message{Role: m.Role, Content: m.Content, Thinking: m.Thinking, ToolName: m.ToolName}
		for i, c := range m.ToolCalls {
			msg.ToolCalls = append(msg.ToolCalls, toolCall{
				ID:       c.ID,
				Function: toolCallFunction{Index: i, Name: c.Function.Name, Arguments: c.Function.Arguments},
			})
		}
		out = append(out, msg)
	}
	return strings.Join(system, "\n\n"), out
}

// legacy renders a template without .Messages: one run per user turn (a system message
// starts a new one), then the last turn cut after {{ .Response }}, so the prompt ends where
// the model's reply begins.
func legacy(tmpl *template.Template, msgs []*message, think, thinkSet bool, thinkLevel string, b *bytes.Buffer) error {
	vars := func(system, prompt, response string) map[string]any {
		return map[string]any{
			"System": system, "Prompt": prompt, "Response": response,
			"Think": think, "ThinkLevel": thinkLevel, "IsThinkSet": thinkSet,
		}
	}
	var system, prompt, response string
	flush := func() error {
		if err := tmpl.Execute(b, vars(system, prompt, response)); err != nil {
			return fmt.Errorf("execute the template: %w", err)
		}
		system, prompt, response = "", "", ""
		return nil
	}
	for _, m := range msgs {
		switch m.Role {
		case "system":
			if prompt != "" || response != "" {
				if err := flush(); err != nil {
					return err
				}
			}
			system = m.Content
		case "user":
			if response != "" {
				if err := flush(); err != nil {
					return err
				}
			}
			prompt = m.Content
		case "assistant":
			response = m.Content
		}
	}
	cut := false
	root := cutAfterResponse(tmpl.Root.CopyList(), &cut)
	last, err := template.New("").Option("missingkey=zero").Funcs(funcs).AddParseTree("", &parse.Tree{Root: root.(*parse.ListNode)})
	if err != nil {
		return err
	}
	if err := last.Execute(b, vars(system, prompt, response)); err != nil {
		return fmt.Errorf("execute the template: %w", err)
	}
	return nil
}

// cutAfterResponse drops the {{ .Response }} field and every node after it in walk order
// (whatever the template writes after the reply), pruning actions and pipes left empty.
func cutAfterResponse(n parse.Node, cut *bool) parse.Node {
	if f, ok := n.(*parse.FieldNode); ok && contains(f.Ident, "Response") {
		*cut = true
		return nil
	}
	if *cut {
		return nil
	}
	switch x := n.(type) {
	case *parse.ListNode:
		kept := x.Nodes[:0]
		for _, c := range x.Nodes {
			if c := cutAfterResponse(c, cut); c != nil {
				kept = append(kept, c)
			}
		}
		x.Nodes = kept
	case *parse.IfNode:
		cutBranch(&x.BranchNode, cut)
	case *parse.RangeNode:
		cutBranch(&x.BranchNode, cut)
	case *parse.WithNode:
		cutBranch(&x.BranchNode, cut)
	case *parse.ActionNode:
		p := cutAfterResponse(x.Pipe, cut)
		if p == nil {
			return nil
		}
		x.Pipe = p.(*parse.PipeNode)
	case *parse.PipeNode:
		cmds := x.Cmds[:0]
		for _, c := range x.Cmds {
			args := c.Args[:0]
			for _, a := range c.Args {
				if a := cutAfterResponse(a, cut); a != nil {
					args = append(args, a)
				}
			}
			if len(args) == 0 {
				return nil
			}
			c.Args = args
			cmds = append(cmds, c)
		}
		if len(cmds) == 0 {
			return nil
		}
		x.Cmds = cmds
	}
	return n
}

func cutBranch(b *parse.BranchNode, cut *bool) {
	b.List = cutAfterResponse(b.List, cut).(*parse.ListNode)
	if b.ElseList != nil {
		b.ElseList = cutAfterResponse(b.ElseList, cut).(*parse.ListNode)
	}
}

func responseAction() *parse.ActionNode {
	field := &parse.FieldNode{NodeType: parse.NodeField, Ident: []string{"Response"}}
	cmd := &parse.CommandNode{NodeType: parse.NodeCommand, Args: []parse.Node{field}}
	return &parse.ActionNode{NodeType: parse.NodeAction, Pipe: &parse.PipeNode{NodeType: parse.NodePipe, Cmds: []*parse.CommandNode{cmd}}}
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// identifiers collects, lower-cased, the field and variable names a template uses (Ollama's
// test for a .Messages template, and for whether it names .Response).
func identifiers(n parse.Node) map[string]bool {
	names := map[string]bool{}
	visit(n, func(n parse.Node, _ []parse.Node) {
		switch x := n.(type) {
		case *parse.FieldNode:
			for _, id := range x.Ident {
				names[strings.ToLower(id)] = true
			}
		case *parse.VariableNode:
			for _, id := range x.Ident {
				names[strings.ToLower(id)] = true
			}
		}
	})
	return names
}

// thinkingTags is Ollama's rule for a template's thinking tags: at each .Thinking field
// inside a range whose pipeline names .Messages, the nearest enclosing list's first and
// last nodes, when they are text, give the opening and closing tag (trimmed); a later
// .Thinking overrides an earlier one.
func thinkingTags(root *parse.ListNode) (string, string) {
	open, close := "", ""
	visit(root, func(n parse.Node, ancestors []parse.Node) {
		f, ok := n.(*parse.FieldNode)
		if !ok || len(f.Ident) == 0 || f.Ident[0] != "Thinking" {
			return
		}
		var r *parse.RangeNode
		for i := len(ancestors) - 1; i >= 0 && r == nil; i-- {
			r, _ = ancestors[i].(*parse.RangeNode)
		}
		if r == nil || !namesField(r.Pipe, "Messages") {
			return
		}
		for i := len(ancestors) - 1; i >= 0; i-- {
			l, ok := ancestors[i].(*parse.ListNode)
			if !ok {
				continue
			}
			if t, ok := l.Nodes[0].(*parse.TextNode); ok {
				open = strings.TrimSpace(string(t.Text))
			}
			if t, ok := l.Nodes[len(l.Nodes)-1].(*parse.TextNode); ok {
				close = strings.TrimSpace(string(t.Text))
			}
			break
		}
	})
	return open, close
}

func namesField(p *parse.PipeNode, name string) bool {
	found := false
	if p != nil {
		visit(p, func(n parse.Node, _ []parse.Node) {
			if f, ok := n.(*parse.FieldNode); ok && len(f.Ident) > 0 && f.Ident[0] == name {
				found = true
			}
		})
	}
	return found
}

// visit calls fn on every node under n in template order (a branch's pipeline, then its
// list, then its else list), with the node's ancestors.
func visit(n parse.Node, fn func(n parse.Node, ancestors []parse.Node)) {
	var walk func(n parse.Node, ancestors []parse.Node)
	walk = func(n parse.Node, ancestors []parse.Node) {
		if n == nil {
			return
		}
		fn(n, ancestors)
		ancestors = append(ancestors, n)
		var children []parse.Node
		switch x := n.(type) {
		case *parse.ListNode:
			if x == nil {
				return
			}
			children = x.Nodes
		case *parse.IfNode:
			children = []parse.Node{&x.BranchNode}
		case *parse.RangeNode:
			children = []parse.Node{&x.BranchNode}
		case *parse.WithNode:
			children = []parse.Node{&x.BranchNode}
		case *parse.BranchNode:
			children = []parse.Node{x.Pipe}
			if x.List != nil {
				children = append(children, x.List)
			}
			if x.ElseList != nil {
				children = append(children, x.ElseList)
			}
		case *parse.ActionNode:
			children = []parse.Node{x.Pipe}
		case *parse.TemplateNode:
			if x.Pipe != nil {
				children = []parse.Node{x.Pipe}
			}
		case *parse.PipeNode:
			if x == nil {
				return
			}
			for _, c := range x.Cmds {
				children = append(children, c)
			}
		case *parse.CommandNode:
			children = x.Args
			// Like Ollama's walks, none into a chain's base ((index ...).Role).
		}
		for _, c := range children {
			walk(c, ancestors)
		}
	}
	walk(n, nil)
}
